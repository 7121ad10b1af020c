from retrofit_agent.cli import main

raise SystemExit(main())
