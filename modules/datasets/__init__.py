"""The data sets the scripts train on: a pretraining corpus, SMS spam, instruction records."""
