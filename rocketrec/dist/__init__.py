"""rocketrec.dist"""
