"""rocketrec.model"""
