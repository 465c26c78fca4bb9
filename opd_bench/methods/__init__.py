"""The built-in methods, one file each (see base.py for what a method declares).

The registry imports every module of this folder on first use; `base` holds the declarations' vocabulary.
"""
