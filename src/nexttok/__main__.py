from nexttok.cli import main

main()
