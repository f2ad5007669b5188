"""The applications that compose the pipeline: run, suite, reproduce, the CLI and the DP benchmark."""
