from minicloud.cli.main import main

raise SystemExit(main())
