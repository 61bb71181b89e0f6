"""The tokeniser service (`llmp.tokenizer.v1`): train, import and serve tokenisers. Run: python -m services.tokenizer"""
