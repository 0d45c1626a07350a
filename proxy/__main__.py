from proxy.cli.commands import main

raise SystemExit(main())
