"""`python -m fedscan.common.cli`: the `fedscan` command."""

from fedscan.common.cli import main

main()
