"""Course exercises: stubs in templates/, the checker in check.py, the project's answers in reference.py.

See EXERCISES.md at the repository root.
"""
