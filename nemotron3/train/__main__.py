"""`python -m nemotron3.train RECIPE.json [...]`, also under `torchrun --nproc-per-node N -m nemotron3.train`."""
from .pretrain import main

main()
