"""A miniature GLUE folder (two examples per split and task, in each task's file layout) and a
tiny model folder, for the GLUE scripts' tests."""
from models import tiny_bert

FILES = {  # train and dev share each task's layout
    "CoLA": "gj04\t1\t\tthe cat sat .\ngj04\t0\t*\tsat cat the .\n",
    "SST-2": "sentence\tlabel\na fine film \t1\na dull film \t0\n",
    "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tthe cat sat .\ta cat sat .\n"
            "0\t3\t4\tthe dog ran .\tthe cat sat .\n",
    "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
             "0\tg\tf\ty\t0\tn\tn\ta cat .\tthe cat .\t4.200\n1\tg\tf\ty\t1\tn\tn\ta dog .\tthe cat .\t0.500\n",
    "RTE": "index\tsentence1\tsentence2\tlabel\n0\tthe cat sat .\ta cat sat .\tentailment\n"
           "1\tthe dog ran .\tthe cat sat .\tnot_entailment\n",
}


def write_glue(path):
    """The five tasks' train and dev files under `path` (train repeats the examples 4 times)."""
    for folder, text in FILES.items():
        (path / folder).mkdir()
        for split in ("train", "dev"):
            header, rows = ("", text) if folder == "CoLA" else text.split("\n", 1)
            (path / folder / f"{split}.tsv").write_text(
                (header + "\n" if header else "") + (rows * 4 if split == "train" else rows))
    return path


def tiny_model_dir(path):
    """A tokenizer over the words of FILES and a tiny random BERT encoder, saved as a model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for text in FILES.values() for w in text.lower().split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words[:93])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(path)
    model = tiny_bert(0)
    model.config.num_labels = 2
    model.bert.save_pretrained(path)  # the encoder only, as the MiniLM package ships it
    return str(path)
