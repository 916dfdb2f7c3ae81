"""rocketrec.parallel"""
