"""rocketrec.data"""
