"""Analysis of trained SAEs: the feature atlas (statistics, examples, labels) and its file."""
