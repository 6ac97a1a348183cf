"""replay-trace: teachers' consensus against a student's answers, turned into DPO pairs.

`normalize` makes agreeing answers compare equal; `consensus` decides what the teachers agree on
and writes a pair where the student departs from it.
"""
