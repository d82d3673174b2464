"""Exercise checks: ``core`` is the framework; ``chNN`` holds chapter NN's checks.

In a notebook: ``from course_utils.checks import ch00 as check`` then ``check.cosine_similarity_matrix(fn)``.
"""
