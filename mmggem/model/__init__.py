"""The model library: open_clip towers with a pluggable pooler, the poolers (GGeM), transforms, text length, pretrained weights and Hub names."""
