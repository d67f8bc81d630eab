"""The library core: N:M masks, recipes and their schedules, which layers a recipe takes, and the sparsifier.

Needs torch alone; everything else in nmflow builds on this package.
"""
