"""The process runtime: owns the event loop, signals and the root TaskGroup of `meshlink run`."""
