"""Memory: the profiles, the planner that picks one for the free memory, and the weight streaming it uses."""
