from vlmindex.cli import main

main()
