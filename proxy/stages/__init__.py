"""The request pipeline's stages, one module or package each, in pipeline order."""
