"""rocketrec.train"""
