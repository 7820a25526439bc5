"""Where a stream runs: in the app's own process or on a worker of a Ray Serve pool (between demo/ and pipelines/)."""
