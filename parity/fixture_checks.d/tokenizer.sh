# Regenerates the tokenizer fixtures with the slow LlamaTokenizer (transformers 4.37.2) and compares.
python parity/tokenizer_fixtures.py --check
