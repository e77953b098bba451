"""The control plane: the scheduler, joining a job, authentication, the
launchers and diagnostics.  It moves no tensor bytes."""
