from statsd_server.cli import main

main()
