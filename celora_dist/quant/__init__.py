"""CE-QLoRA: CE-LoRA over a frozen base stored by bitsandbytes (4-bit NF4/FP4, LLM.int8).

``bnb.py`` reads the quantized storage (full and row-gathered dequantization, the forward
product, a cache key); ``layer.py`` is the CE-LoRA linear over it. bitsandbytes stays an
optional dependency: nothing here imports it until a quantized layer is met.
"""
