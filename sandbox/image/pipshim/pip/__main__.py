import sys

from jupybox_pip import main

sys.exit(main(sys.argv[1:]))
