"""The model catalogue: which groups and models exist, where they are loaded, who may see them, and their listings."""
