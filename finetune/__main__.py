"""`python -m finetune`: see finetune/train.py."""

from finetune.train import main

main()
