//! SentencePiece tokenizer equal to the slow `LlamaTokenizer` of transformers 4.37.2.
