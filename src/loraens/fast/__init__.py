"""The speed levers of the member forward, one module each.

None of them changes a result beyond float rounding; each is checked against the plain forward
in the tests, and each has a switch (`--speed.*`, `--model.attn_implementation`,
`--ensemble.prefix_cache`, `--train.compile`) so `bench/bench_levers.py` can time it on and off.

support     which models the levers support (the Llama layout), `decoder_of`
packing     token packing: each member's rows end to end [M, P], no padding in linears or MLPs
attention   grouped eager attention (CPU), and attention over packed rows
prefix      the frozen-prefix cache: layers below the lowest LoRA layer run once per question
last_layer  the last layer's MLP only at the positions the output head reads
head        the full-vocabulary head of choice-likelihood: float32-exact from bf16 GEMMs, in blocks
compiling   `torch.compile` of the decoder layers, and when it pays
"""
