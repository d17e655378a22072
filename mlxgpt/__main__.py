from mlxgpt.cli import main

main()
