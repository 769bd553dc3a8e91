"""Tokenizers for the tiny presets, built locally (no hub).

A WordPiece vocabulary of common medical-VQA words plus single characters and `##` continuations, so any
ASCII text tokenizes (unknown words fall back to characters) and decoding round-trips.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizer, PreTrainedTokenizerFast

WORDS = """
yes no left right upper lower both neither none normal abnormal
is are was were there a an the this that these those it its of in on at to with without for from by and or not
what which where how many much does do show shows shown seen see present absent visible contain contains
image images scan scans picture view plane slice region side part organ organs body
lesion lesions mass masses nodule nodules tumor tumors cyst cysts spot spots dot dots finding findings
large small big tiny size bright dark round oval shape single multiple one two three four five six seven eight
nine ten zero number count
liver lung lungs kidney kidneys brain heart spleen bladder stomach bone bones chest abdomen head pelvis colon
ct mri mr xray x ray ultrasound pet modality contrast t1 t2 flair weighted axial coronal sagittal
modality used taken type kind
caption describe description report impression findings patient study
""".split()

SPECIALS_LLAVA = ["<pad>", "[UNK]", "<s>", "</s>", "<image>"]
SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


def _vocab(specials: list[str]) -> dict[str, int]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + [f"##{c}" for c in chars] + sorted(set(WORDS) - set(chars))
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """Fast WordPiece tokenizer with LLaVA's special tokens (`<s>`, `</s>`, `<pad>`, `<image>`)."""
    vocab = _vocab(SPECIALS_LLAVA)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )
    return fast


def build_bert_tokenizer() -> BertTokenizer:
    """BERT WordPiece tokenizer with BLIP's `[DEC]` (decoder bos) and `[ENC]` tokens."""
    vocab = _vocab(SPECIALS_BERT)
    return BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", additional_special_tokens=["[ENC]"])
