"""BERT (Devlin et al. 2019, sec. 3: base L=12 H=768 A=12, large L=24 H=1024 A=16) and RoBERTa (Liu et al. 2019):
sizes from the papers and the released config.json files. Counts are those of the released checkpoints' tensors
(BertForPreTraining: encoder + pooler + MLM and NSP heads; RobertaForMaskedLM: encoder + LM head), tied weights
counted once."""
from llmarch.presets import register

BERT = dict(kind="encoder", vocab_size=30522, max_seq_len=512, norm="layernorm", norm_eps=1e-12,
            norm_placement="post", embed_norm=True, final_norm=False, ffn="mlp", activation="gelu", ffn_bias=True,
            qkv_bias=True, out_bias=True, position="learned", type_vocab_size=2, tie_embeddings=True,
            head="pretraining", dropout=0.1, attn_dropout=0.1, pad_token_id=0)

register("bert-base", dict(BERT, d_model=768, n_layers=12, n_heads=12, d_ff=3072), 110_106_428)
register("bert-large", dict(BERT, d_model=1024, n_layers=24, n_heads=16, d_ff=4096), 336_226_108)
register("bert-tiny", dict(BERT, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128))

# RoBERTa: BERT's encoder trained longer without NSP; positions start after the padding id (pad = 1), so the
# table has 512 + 2 rows; one token type; byte-level BPE vocabulary.
ROBERTA = dict(BERT, vocab_size=50265, max_seq_len=514, norm_eps=1e-5, type_vocab_size=1, head="mlm",
               pad_token_id=1, bos_token_id=0, eos_token_id=2, position_offset=2)
register("roberta-base", dict(ROBERTA, d_model=768, n_layers=12, n_heads=12, d_ff=3072), 124_697_433)
register("roberta-large", dict(ROBERTA, d_model=1024, n_layers=24, n_heads=16, d_ff=4096), 355_412_057)
register("roberta-tiny", dict(ROBERTA, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=130))
