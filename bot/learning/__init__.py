"""The improvement loop: corrected mistakes become candidate prompt versions.

``cycle`` decides what one cycle does (pure rules and the loop's configuration),
``candidates`` writes a candidate version, ``offline_eval`` checks it on held-out texts,
``loop`` runs a cycle against the bot's store and versions, ``standin`` and ``simulation``
let the whole loop run on simulated users.
"""
