"""The Hugging Face bridge: which transformers family a model is and its config.json both ways
(families.py), weight names and safetensors files (convert.py), and the exported tokenizer
folder (tokenizer.py)."""
