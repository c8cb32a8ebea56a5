"""Default CRNN weights and model card, installed as package data of beetsplug.crnn."""
