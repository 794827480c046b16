"""Lightning callbacks and plugins trainyard adds to the Trainer."""
