from dsframe.cli import main

main()
