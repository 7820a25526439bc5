"""DWPose-driven animation: keypoint extraction, skeleton drawing, alignment and pose conditioning."""
