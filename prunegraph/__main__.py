from prunegraph.cli import main

main()
