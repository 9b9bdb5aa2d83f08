"""`curate review`: a local web page over the manifest to look at and correct curate's decisions.

``state`` reads and changes the manifest (every change one transaction, journaled for undo); ``app`` is
the Starlette app that renders the pages and takes the clicks; ``static/`` holds its CSS and JS.
"""
