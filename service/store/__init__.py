"""What the service keeps: the database (jobs, checkpoints, logins), content-addressed files and
the result cache."""
