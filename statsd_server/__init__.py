"""statsd_server: a sharded, in-memory stats server for API request logs."""

__version__ = "0.1.0"
