from retrofit_agent.daemon.cli import main

raise SystemExit(main())
