import sys

from vllm_elastic.cli.main import main

sys.exit(main())
