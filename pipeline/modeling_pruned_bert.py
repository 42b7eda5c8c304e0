"""A BERT classifier whose layers keep different numbers of FFN neurons (after structured pruning).

transformers records pruned attention heads in `config.pruned_heads` and re-applies them when it loads a
model, but it has no per-layer FFN width: `BertConfig.intermediate_size` is one number. `bertforge prune`
copies this file into a pruned artifact whose FFN widths differ between layers, stores the widths as
`config.intermediate_sizes` and points `config.auto_map` here, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

builds the shrunken layers before loading the weights. The file must stay self-contained (torch and
transformers only): transformers imports it from the artifact folder, not from bertforge.
"""
from torch import nn
from transformers import BertConfig, BertForSequenceClassification


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    config_class = BertConfig

    def __init__(self, config):
        super().__init__(config)
        sizes = getattr(config, "intermediate_sizes", None) or []
        for layer, size in zip(self.bert.encoder.layer, sizes):
            if size != layer.intermediate.dense.out_features:
                layer.intermediate.dense = nn.Linear(config.hidden_size, size)
                layer.output.dense = nn.Linear(size, config.hidden_size)
