from lit_ft.cli import main

main()
