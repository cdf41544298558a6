# The quick run with a product-key memory layer (Memory+, "Memory Layers at Scale") in place of layer 2's MLP:
# 128^2 = 16,384 value slots of 128 numbers (2.1M parameters, twice the rest of the model), 4 heads reading 16
# each per token. Everything else is the quick run's.
out_dir = "out-shakespeare-char-memory"
memory_layers = (2,)
memory_keys = 128
memory_topk = 16
memory_heads = 4
memory_key_dim = 64
