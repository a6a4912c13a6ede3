"""Dataset readers (VOC, COCO), the embedded synthetic world and sample builders."""
